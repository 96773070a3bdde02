"""The methods: one module per method (or family), each a declaration on the engine."""
