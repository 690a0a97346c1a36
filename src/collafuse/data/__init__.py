"""Datasets and their partition into clients."""

from .base import ClientData, FederatedData, load_federated, load_section

__all__ = ["ClientData", "FederatedData", "load_federated", "load_section"]
