"""fedsim: federated fine-tuning of Mixture-of-Experts LLMs on Ray."""

import logging

# peft imports bitsandbytes whenever it is installed, and bitsandbytes then warns, on a machine without CUDA,
# that its 8-bit optimisers need CUDA. fedsim quantizes the frozen base only and never uses them; set before
# any fedsim module imports peft.
logging.getLogger("bitsandbytes.cextension").setLevel(logging.ERROR)
