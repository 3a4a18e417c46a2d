"""CSPResNet-50 training library: model, recipe, optimizer, engine, checkpoints."""
