"""The fit layer: the CLIP model, the TIME protocol and the Lightning callbacks that run it task after task,
evaluation, the FLOP budget, and the LightningCLI that assembles them (docs/ARCHITECTURE.md, "Layers")."""
