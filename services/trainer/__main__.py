"""The trainer service: step-budget LoRA training sessions."""

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from services.common import server
from services.trainer.wiring import register

if __name__ == "__main__":
    # Loading bars would fill the service log; the session log says what loads.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    server.main("trainer", register)
