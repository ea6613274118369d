"""megatron_transmamba: pretrain TransMamba language models on megatron-core.

The Triton kernels live in the repository folder ``kernels/`` but are installed as
``transmamba_kernels``: Hugging Face's kernel hub package already owns the import name
``kernels``.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["megatron_transmamba", "megatron_transmamba.*"])
kernel_packages = find_packages(where=".", include=["kernels", "kernels.*"])
packages += ["transmamba_kernels" + name[len("kernels"):] for name in kernel_packages]

setup(
    name="megatron_transmamba",
    version="0.1.0",
    description="TransMamba (Transformer + Mamba-2 with TransPoints) pretraining on megatron-core",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"transmamba_kernels": "kernels"},
    install_requires=[
        # Any release that 2.13.0 satisfies: the CPU machines install 2.13.0 from a local file.
        "torch>=2.6,<2.14",
        "megatron-core>=0.16.1,<0.17",
        "numpy",
        "pyyaml>=6",
        "tqdm",
        "tensorboard",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "psutil",
        "scipy>=1.10",        # scaling-law fits (megatron_transmamba/scaling/fit.py)
        "matplotlib>=3.7",    # scaling-law plots, Agg backend
    ],
    extras_require={
        "test": ["pytest>=8", "transformers>=5,<6", "triton==3.7.1", "ruff==0.17.6"],
    },
)
