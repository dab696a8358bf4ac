"""What keeps the equipment safe: ownership, the rules between commands and pins, the watchdog."""
