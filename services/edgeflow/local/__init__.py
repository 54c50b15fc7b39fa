"""Running the suite on one machine: a Redis server process and the service processes."""
