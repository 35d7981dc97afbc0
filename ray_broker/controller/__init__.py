"""Pure cluster-metadata state machine; the ControllerActor wraps it."""
