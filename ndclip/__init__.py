"""NdCLIP's library: data sources and transforms, the frozen-tower feature cache, retrieval metrics, training helpers,
the Hub side (model card, push), inference and the `ndclip` command, the offline demo and the tiny towers.

The model itself lives in the three files beside this package (`configuration_ndclip.py`, `modeling_ndclip.py`,
`processing_ndclip.py`), which are copied into every saved model so that it loads from the Hub on its own. Importing
this package imports nothing heavy: each module is imported where it is used.
"""

__version__ = "0.1.0"
