"""`pi-controller simulate`: the run on a virtual clock, its verdict and its picture."""
