"""What every layer uses: atomic file writes, run-folder locks, disk-space checks, one-line user errors and the
location of the files timelit ships (docs/ARCHITECTURE.md, "Layers")."""
