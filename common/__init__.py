"""What data/ and cspresnet/ both stand on: the errors that end a script, how a file is written, recipe field helpers, the process context."""
