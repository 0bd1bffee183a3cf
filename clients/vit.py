"""Classify and embed images through the served ViT ensembles, over gRPC or HTTP (tritonclient).

    from clients.vit import ViTClient
    ViTClient("127.0.0.1:8001").classify_one(open("cat.jpg", "rb").read())

The client itself lives in kiln (kiln/vit.py), where the API service's ViT routes use it too.
"""

from kiln.vit import Classification, Embedding, ViTClient

__all__ = ["Classification", "Embedding", "ViTClient"]
