"""The vision path: frozen image backbones, feature adapters, feature cache, image federations."""
