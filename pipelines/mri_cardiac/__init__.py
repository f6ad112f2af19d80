"""mri-cardiac: RV, LV myocardium and LV cavity on cine short-axis MRI; ED/ES SEGs and an SR with function."""
