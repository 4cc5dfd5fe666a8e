# Importing the experiments loads the labml adapter first: it checks the installed labml and makes labml's notebook
# logger work with IPython 9, before labml creates that logger
from labml_nn.experiments import labml_adapter  # noqa: F401
