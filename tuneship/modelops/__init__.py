"""Operations on weights: the 16-bit merge, GPTQ and its calibration data, the compute
precision. Heavy libraries are imported inside the functions.

Empty on purpose: importing the package loads none of its modules."""
