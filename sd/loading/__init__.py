"""From a checkpoint file to model modules: split into components, detect the architecture, load."""
