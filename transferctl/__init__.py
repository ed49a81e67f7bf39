"""transferctl: transfer learning for image classification, one YAML file and one command."""

__version__ = "0.1.0"
