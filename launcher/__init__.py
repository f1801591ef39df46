"""The launcher behind `make run` (and the tests' mesh): NATS, the services, the events
bridge and Envoy as local processes."""
