"""The `ray-broker` command line: start/stop/status, topics, console produce/consume."""
