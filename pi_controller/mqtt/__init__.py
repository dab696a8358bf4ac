"""MQTT: publishing policy, Home Assistant discovery, the operator's inbox."""
