"""The input pipeline: ImageNet-layout datasets, transforms, samplers and loaders."""
