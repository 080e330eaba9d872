from setuptools import find_packages, setup

setup(
    name="meanflow-fast",
    version="0.1.0",
    description="Fast MeanFlow training and one-step sampling: a DiT with fused Triton JVP kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["meanflow_fast", "meanflow_fast.*"]),
    install_requires=[
        "torch>=2.4,<2.15",  # 2.13 (CPU, CI) and 2.11 (GPU image) both satisfy it
        "triton>=3.2",       # CUDA kernels; on CPU its interpreter (TRITON_INTERPRET=1) runs the tests
        "numpy",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "demo": ["scikit-learn", "pillow"],
        "imagenet": ["diffusers>=0.27", "pillow"],  # SD-VAE (AutoencoderKL); no torchvision needed
        "dev": ["pytest", "pytest-benchmark", "scikit-learn", "pillow", "diffusers>=0.27"],
    },
    entry_points={
        "console_scripts": [
            "meanflow-demo=meanflow_fast.demo:cli",
            "meanflow-extract=meanflow_fast.imagenet.extract:console",
            "meanflow-train=meanflow_fast.imagenet.train:console",
            "meanflow-sample=meanflow_fast.imagenet.sample:console",
            "meanflow-fid=meanflow_fast.imagenet.fid:console",
        ],
    },
)
