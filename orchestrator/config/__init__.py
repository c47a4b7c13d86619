"""The job as typed data: the schema (the only defaults), loading it, values derived from it
and the machine, and the rules on it alone (choices, ranges, precision, launcher keys, resume).
Torch-free; imports only `common`.
"""
