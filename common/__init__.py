"""What data/ and cspresnet/ both stand on: errors, file writing, recipe fields, the process context."""
