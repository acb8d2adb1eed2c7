"""Layers with a forward pass and a hand-written backward pass."""

from npyrnn.nn.gru import GRU
from npyrnn.nn.linear import Linear
from npyrnn.nn.lstm import LSTM
from npyrnn.nn.module import Module
from npyrnn.nn.recurrent import Recurrent
from npyrnn.nn.rnn import RNN

__all__ = ["RNN", "GRU", "LSTM", "Linear", "Module", "Recurrent"]
