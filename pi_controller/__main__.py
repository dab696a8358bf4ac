from pi_controller.cli import entry

entry()
