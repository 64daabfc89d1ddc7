"""fedblend: federated, personalized, parameter-efficient fine-tuning of foundation models."""

__version__ = "0.1.0"
