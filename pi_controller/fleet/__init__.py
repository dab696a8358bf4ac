"""A fleet of nodes on one broker: signed plugin rollouts, the node side (`node`) and the tool (`tool`)."""
