"""The Flower engine: the protocol of docs/design.md section 4 as a Flower ServerApp and ClientApp.

``simulation.run`` runs it in one command (``collafuse run --engine flower``); ``flwr run .`` and a
deployment with a SuperLink and one SuperNode per client use the same apps (docs/flower.md).
"""
