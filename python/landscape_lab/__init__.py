"""landscape-lab: the science layer of landscape-ext (fits, barriers, optimizers, experiments).

It calls only the public functions of :mod:`landscape_ext`.
"""
__version__ = "0.1.0"
