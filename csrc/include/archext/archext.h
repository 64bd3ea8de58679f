// archext C++ API: include this one header.
#pragma once

#include "archext/activation.h"
#include "archext/norm.h"
#include "archext/rope.h"
