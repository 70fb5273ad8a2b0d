print("lycoris")
