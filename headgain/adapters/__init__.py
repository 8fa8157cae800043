"""How headgain reaches a model's attention: ``transformers`` models through their attention
interface, plain PyTorch models through their ``scaled_dot_product_attention`` calls."""
