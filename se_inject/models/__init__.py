"""From a name to a model: registry names, loading, pretrained weights and the input size.

- ``names``: ``timm:resnet50.a1_in1k``, ``torchvision:resnet18`` parsed into a ``ModelSpec``;
- ``arguments``: constructor arguments (``--model-arg``) parsed and recorded;
- ``weights``: creating a model with random, pretrained or cached weights (the download path);
- ``weight_files``: reading a weights file safely (safetensors, or pickles of plain data only);
- ``loading``: ``load_model``, which puts those together, and the rebuild used by checkpoints;
- ``input_size``: the input size a model declares (timm's pretrained config, torchvision's docs);
- ``listing``: the names ``se-inject --list`` shows.
"""
