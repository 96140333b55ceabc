#pragma once
#include "../../../../fake_torch.h"
