"""Model zoo sized for CPU reproduction: MLP, small CNN, ResNet-18, MLP-Mixer, tiny ViT,
one text model, the pretrained all-MiniLM-L6-v2 (``minilm``, needs transformers), a
small DDPM U-Net (``ddpm-unet``, trained on noise prediction: :func:`task_of`), and two causal
language models: a small GPT-2-style decoder trained from scratch (``gpt2-tiny``) and the
pretrained SmolLM2-135M (``smollm2-135m``, needs transformers and gguf;
:mod:`greenprop.models.smollm`).

Every model's output layer is an attribute named ``head`` (the classifiers' ``nn.Linear``,
the U-Net's output ``nn.Conv2d``), so methods that must keep the output layer dense can
find it by name.
"""

from greenprop.models.cnn import SmallCNN
from greenprop.models.gpt import GPT2Tiny
from greenprop.models.mixer import MixerBlock, MLPMixer
from greenprop.models.mlp import MLP
from greenprop.models.registry import DIFFUSION_MODELS, LM_MODELS, MODELS, TEXT_MODELS, create, task_of
from greenprop.models.resnet import BasicBlock, ResNet18
from greenprop.models.unet import DDPMUNet, ResBlock
from greenprop.models.vit import Block, ViT

__all__ = [
    "DIFFUSION_MODELS",
    "LM_MODELS",
    "MLP",
    "MODELS",
    "TEXT_MODELS",
    "BasicBlock",
    "Block",
    "DDPMUNet",
    "GPT2Tiny",
    "MLPMixer",
    "MixerBlock",
    "ResBlock",
    "ResNet18",
    "SmallCNN",
    "ViT",
    "create",
    "task_of",
]
