"""flowrl.plans"""
