"""tmkt: Time-step Mixup Knowledge Transfer for spiking networks, from event data to the edge."""

__version__ = "0.1.0"
