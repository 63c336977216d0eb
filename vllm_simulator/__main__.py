"""``python -m vllm_simulator --port P --served-model-name NAME``."""
from vllm_simulator.server import main

main()
