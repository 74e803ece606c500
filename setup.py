"""csae_jax: Cascaded Sparse Autoencoders in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name='csae_jax',
    version='0.1.0',
    description='Cascaded sparse autoencoders (multi-level concepts of MLLM activations) in JAX',
    packages=find_packages(include=['csae_jax', 'csae_jax.*', 'experiments', 'experiments.*']),
    package_data={'csae_jax.reports': ['report.css', 'report.js']},  # inlined into the report
    python_requires='>=3.11',
    install_requires=[
        'jax==0.10.2',
        'flax==0.12.8',
        'optax==0.2.8',
        'orbax-checkpoint==0.12.8',
        'ml_collections==1.1.0',
        'tensorflow-datasets==4.9.10',
        'transformers>=5,<6',
        'absl-py',
        'numpy',
        # Added libraries (the README says why each is here):
        'safetensors>=0.4',
        'scipy',
        'scikit-learn',
        'jaxtyping',
        'tqdm',
        'tensorboard',  # its framework-free event-file writer (train/summaries.py)
        'matplotlib',
        'pillow',
        'importlib_resources',  # tensorflow-datasets needs it to open builders, but does not declare it
    ],
    extras_require={
        # torch is a test-time numerical reference only; pinned to the CPU wheel on local disk.
        # nbclient, nbformat, ipykernel: the suite executes the notebooks in colabs/.
        # scikit-image: real photographs (skimage.data) that ship offline, for harvest parity.
        'test': ['pytest', 'pytest-xdist', 'torch==2.13.0', 'nbclient', 'nbformat', 'ipykernel',
                 'scikit-image'],
    },
)
