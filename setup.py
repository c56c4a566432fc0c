from setuptools import find_packages, setup

setup(
    name="colora_fused",
    version="0.1.0",
    description="Fused Triton kernels and drop-in layers for CoLoRA fine-tuning of convolutional networks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["colora_fused", "colora_fused.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The lower bounds are what CI tests: .ci/image_leg.sh runs the GPU image's torch 2.11 / triton 3.6.
        "torch>=2.11",
        "torchvision>=0.26",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=1.22",
        "tqdm>=4.60",
        "safetensors>=0.4",
    ],
    extras_require={
        "bench": ["matplotlib>=3.5", "peft>=0.10"],
        "finetune": ["matplotlib>=3.5", "scikit-learn>=1.1"],
        "test": ["pytest>=7.4", "pytest-xdist>=3.0", "pytest-benchmark>=4.0", "matplotlib>=3.5", "scikit-learn>=1.1",
                 "peft>=0.10", "hypothesis>=6.0", "transformers>=4.30", "lightning>=2.0", "timm>=1.0"],
    },
    entry_points={
        "console_scripts": [
            "colora-bench=colora_fused.bench:main",
            "colora-finetune=colora_fused.finetune:main",
            "colora-audit=colora_fused.audit:main",
        ],
    },
)
