"""Model zoo sized for CPU reproduction: MLP, small CNN, ResNet-18, MLP-Mixer, tiny ViT,
and one text model, the pretrained all-MiniLM-L6-v2 (``minilm``, needs transformers).

Every model's final classifier is an ``nn.Linear`` attribute named ``head``, so
methods that must keep the output layer dense can find it by name.
"""

from greenprop.models.cnn import SmallCNN
from greenprop.models.mixer import MixerBlock, MLPMixer
from greenprop.models.mlp import MLP
from greenprop.models.registry import MODELS, TEXT_MODELS, create
from greenprop.models.resnet import BasicBlock, ResNet18
from greenprop.models.vit import Block, ViT

__all__ = [
    "MLP",
    "MODELS",
    "TEXT_MODELS",
    "BasicBlock",
    "Block",
    "MLPMixer",
    "MixerBlock",
    "ResNet18",
    "SmallCNN",
    "ViT",
    "create",
]
