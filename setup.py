"""tuna2_jax: Tuna-2 (encoder-free unified multimodal model) in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name='tuna2_jax',
    version='0.1.0',
    description='Tuna-2 and Tuna-R unified multimodal models in JAX/Flax: pixel-space flow '
                'matching and next-token understanding in one decoder.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=find_packages(include=['tuna2_jax', 'tuna2_jax.*']),
    package_data={'tuna2_jax.data': ['assets/*.model']},
    install_requires=[
        'jax>=0.7',
        'flax>=0.12',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11',
        'grain>=0.2.12',
        'array-record>=0.5',
        'ml-collections>=1.0',
        'sentencepiece>=0.2',
        'safetensors',
        'tokenizers',
        'jinja2',  # tokenizers' chat templates
        'numpy',
        'pillow',
        'opencv-python-headless',
        'tqdm',
        'tensorboardX',
        'matplotlib',
        'absl-py',
    ],
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3', 'torch==2.13.0', 'transformers>=5',
                 'libtpu==0.0.42.*; sys_platform == "linux" and platform_machine == "x86_64"',
                 'gcsfs', 'gcp-storage-emulator', 'wandb'],
        'tfds': ['tensorflow-datasets'],
        'gpu': ['jax[cuda12]'],
        'tpu': ['jax[tpu]'],
        # Compiling for TPU slices from any host (train.py --dry_run_topology): the libtpu that
        # jax[tpu] pins for jax 0.10.2.
        'tpu-aot': ['libtpu==0.0.42.*'],
        # gs:// workdirs: etils.epath's GCS file system (google-cloud-storage comes with it);
        # orbax's arrays go through tensorstore, which needs nothing more.
        'gcs': ['gcsfs'],
        'wandb': ['wandb'],
        # The same for GPU nodes (--dry_run_topology=h100-8): jax's CUDA plugin alone, without
        # the CUDA libraries (no GPU or driver is needed to compile).
        'gpu-aot': ['jax-cuda12-plugin==0.10.2'],
    },
)
