"""tunelab: a tuning and benchmarking laboratory for RLHF (SFT -> RM -> PPO) on DeepSpeed.

The public surface is small; everything that needs torch lives in tunelab.pipeline and is
imported only inside trial processes.
"""

from tunelab.config import TrialConfig, load_config
from tunelab.memory import predict
from tunelab.spec import StudySpec, load_spec

__version__ = "0.1.0"
__all__ = ["StudySpec", "TrialConfig", "__version__", "load_config", "load_spec", "predict"]
