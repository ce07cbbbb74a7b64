"""grpo: train language models with GRPO. `from grpo import GRPOTrainer, GRPOConfig` is TRL's API."""

from grpo.config import GRPOConfig
from grpo.run_state import TrainerState
from grpo.trainer import GRPOTrainer

__version__ = "0.1.0"
__all__ = ["GRPOConfig", "GRPOTrainer", "TrainerState", "__version__"]
