"""What a finished run or sweep is shown as: charts, the sweep summary, `action=report`.
"""
