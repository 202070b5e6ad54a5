"""flowrl.operators"""
