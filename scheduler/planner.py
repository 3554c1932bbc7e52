"""placeholder"""
import math
def closed_form_block(streams: int, layers: int) -> int:
    return max(1, min(layers, round(math.sqrt(streams * layers / (streams + 2)))))
