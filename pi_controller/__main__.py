import sys

from pi_controller.cli import main

sys.exit(main())
